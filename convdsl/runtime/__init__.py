"""Run time: compiling generated C into a cached shared library, and the Model that wraps it."""
