"""Code shared by every moemesh service and the client SDK."""
