"""pinlab.orchestrator"""
