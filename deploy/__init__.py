"""Local launcher and deployment configuration (nginx, compose, Kubernetes)."""
