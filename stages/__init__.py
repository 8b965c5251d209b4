"""Thin entry modules, one per Makefile target: parse args, load config, call pipeline, log."""
