"""defectforge.sweep"""
