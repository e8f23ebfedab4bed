"""formerlab.experiments"""
