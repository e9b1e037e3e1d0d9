from bench import cli

cli.main()
