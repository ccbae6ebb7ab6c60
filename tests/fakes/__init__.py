"""Test fixtures: deterministic images, a fake Docker Hub, a real docker-registry."""
