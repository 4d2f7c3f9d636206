"""Looking at a run: the HTML report (facts, plots, render) and the local viewer."""
