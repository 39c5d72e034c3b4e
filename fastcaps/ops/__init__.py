"""The routing ops and their eager specifications."""
