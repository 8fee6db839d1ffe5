"""pinlab.images"""
