"""formerlab.train"""
