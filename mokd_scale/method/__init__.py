"""The method as data: pure losses, centres, the registry of loss terms and the objective built from it."""
