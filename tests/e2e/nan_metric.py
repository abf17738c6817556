"""A metric that scores NaN (imported by tunelab in the subprocess test of a NaN score)."""


def nan_rate(generations) -> float:
    return float("nan")
