"""defectforge.data"""
