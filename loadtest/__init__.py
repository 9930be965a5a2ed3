"""Load tests (Locust), their report, and the side-by-side latency benchmark of the serving paths."""
