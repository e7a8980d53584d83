from wattkeeper.cli import main

main()
