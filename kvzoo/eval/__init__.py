"""Measurement: quality under compression (`kvzoo eval`) and speed / memory (`kvzoo bench`)."""
