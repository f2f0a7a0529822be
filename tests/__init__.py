"""Tests for the project."""
