"""Synthetic long-context tasks shared by training benchmarks and the evaluation suite.

  passkey.py   a random key stated once at a chosen depth of filler, asked for at the end
               (generator in the windowed batch layout, placement helper, teacher-forced scorer).
"""
