"""MLX backend (Apple silicon; Linux through mlx[cpu])."""
