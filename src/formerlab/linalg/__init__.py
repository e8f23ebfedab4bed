"""formerlab.linalg"""
