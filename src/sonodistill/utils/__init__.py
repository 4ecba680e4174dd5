"""Helpers every layer may use: typed option fields (`fields`), run folders (`rundir`) and lazy
package exports (`lazy`). Importing the package runs nothing."""
