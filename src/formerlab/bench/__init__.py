"""formerlab.bench"""
