"""formerlab.deq"""
