"""defectforge.evaluate"""
