"""Report building: the HTML report and the figures of each analysis (plotly Figures)."""
