"""formerlab.solvers"""
