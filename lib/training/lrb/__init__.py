"""The Learnable Reference Bank of LRB-WREL: the bank and its fill (bank.py), the stage-3 bank schedule and
EMA teacher (schedule.py), the stage-2 / stage-3 steps and their shared script set-up (stages.py)."""
