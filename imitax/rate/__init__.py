"""Blinded pairwise rating studies: people compare two systems' answers in their browser.

``models`` holds the tables and opens the database (SQLite in WAL mode, or PostgreSQL),
``store`` creates studies and hands out and records judgments safely under concurrency,
``app`` is the web app (rater pages, admin page, JSON API) and ``results`` turns judgments into
win/tie/loss rates with bootstrap intervals and inter-rater agreement. ``scripts/rate.py`` is the
command line; docs/rating.md is the user's guide.
"""
