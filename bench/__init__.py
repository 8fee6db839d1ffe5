"""pinlab.bench"""
