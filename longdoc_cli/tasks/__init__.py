"""Task logic: classification and question answering over long documents (library, no printing)."""
