"""Thin actor classes; spawn.py is the only module that turns them into Ray actors."""
