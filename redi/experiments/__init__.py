"""The built-in demo and `redi compare`: experiments assembled from the core."""
