"""Hearth's services. Each subpackage is one process; services never import each other."""
