"""Wire formats: request bodies to arrays and arrays to response bodies."""
