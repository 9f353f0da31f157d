"""matplotlib for the benchmarks' plots: an optional dependency (`pip install 'xlstm7b[plot]'`)."""


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None (with a message) where matplotlib
    is not installed: a benchmark then writes its JSON without the plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return None
    return plt
