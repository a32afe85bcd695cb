"""The pure library beneath every role: routing, statistics, formats, admission.

Nothing here imports Flower, an HTTP stack or argparse.
"""
