"""Readers for a hospital's site folder, and the demo data generator."""
