"""Web page assets (HTML/JS/CSS)."""
