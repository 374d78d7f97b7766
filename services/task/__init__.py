"""The built-in reasoning task (`arith`) and its teacher and student models (`models`)."""
