"""defectforge.train"""
