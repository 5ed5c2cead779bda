"""Run time: compiling generated C into a cached extension, and the Model that wraps it."""
