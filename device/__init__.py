"""pinlab.device"""
