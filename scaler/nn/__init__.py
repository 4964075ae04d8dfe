"""Networks. Each names the role of every parameter dimension; never a mesh axis."""
