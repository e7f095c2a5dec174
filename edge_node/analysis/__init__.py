"""Analysis of one study: series selection, preprocessing, findings, and the SR / SC result objects."""
