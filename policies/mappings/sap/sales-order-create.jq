# Items are numbered 10, 20, ...; the price (PR00) and discount percent (K007) become pricing
# elements. Values are already decimal strings: nothing numeric is computed here.
.TransactionCurrency as $currency
| if .to_Item then
    .to_Item |= (to_entries | map(
      .value as $item
      | ($item | del(._price, ._discount))
        + {SalesOrderItem: ((.key + 1) * 10 | tostring)}
        + {to_PricingElement: [
            (if $item._price then {ConditionType: "PR00", ConditionRateValue: $item._price, ConditionCurrency: $currency} else empty end),
            (if $item._discount then {ConditionType: "K007", ConditionRateValue: $item._discount} else empty end)
          ]}
    ))
  else . end
