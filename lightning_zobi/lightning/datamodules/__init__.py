"""Datamodules for the data sets the package makes offline."""
