"""What more than one service needs: the contract on the bus, the plan model, messaging, security, what
every process is built from, and what the tools share."""
