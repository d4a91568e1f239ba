"""Retrieval beyond the model: the FAISS item index (``index``) that releases export and
serving loads, and offline evaluation of the retrieval head (``evaluate``)."""
