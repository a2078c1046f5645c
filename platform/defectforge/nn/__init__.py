"""defectforge.nn"""
