"""CUDA C++ sources of linrec, shipped as package data and JIT-compiled by ``linrec._cuda``."""
