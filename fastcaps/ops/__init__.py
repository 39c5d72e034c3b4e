"""Subpackage of fastcaps (ops: the routing op and its translations)."""
