"""fileapp: an embeddable WSGI app that serves a directory."""
