"""The test suite by topic; test_all.py runs every module listed in its TOPICS."""
